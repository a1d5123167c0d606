// Grants "Key Vault Secrets User" to one principal on ONE existing key vault
// (Azure RBAC permission model), so Container Apps can resolve the gateway's
// Key Vault secret references with the app's user-assigned identity.
//
// The container app depends on this module: without the role in place first,
// creating the app fails when the platform resolves the references.
targetScope = 'resourceGroup'

@description('Name of the existing key vault in this resource group.')
param vaultName string

@description('Object (principal) id of the managed identity that receives the role.')
param principalId string

// Built-in role "Key Vault Secrets User": read secret values, nothing else.
var secretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource assignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, secretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

@description('Resource id of the role assignment.')
output roleAssignmentId string = assignment.id
