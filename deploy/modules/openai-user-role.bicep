// Grants "Cognitive Services OpenAI User" to one principal on ONE existing
// Azure OpenAI resource. The scope is the account itself, never its resource
// group: the gateway's identity gets data-plane access to exactly the
// resources it fronts and nothing else that lives next to them.
//
// Deployed by main.bicep once per entry of `openAiAccounts`, with this
// module's scope set to that account's resource group (any subscription).
targetScope = 'resourceGroup'

@description('Name of the existing Azure OpenAI (Cognitive Services) account in this resource group.')
param accountName string

@description('Object (principal) id of the managed identity that receives the role.')
param principalId string

// Built-in role "Cognitive Services OpenAI User": inference calls only, no
// key listing, no management of deployments.
var openAiUserRoleId = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: accountName
}

resource assignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  // Deterministic name: redeploying the template updates, never duplicates.
  name: guid(account.id, principalId, openAiUserRoleId)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', openAiUserRoleId)
    principalId: principalId
    // Set explicitly so a freshly created identity does not fail the
    // assignment while Entra ID is still replicating it.
    principalType: 'ServicePrincipal'
  }
}

@description('Resource id of the role assignment (check it after deploying).')
output roleAssignmentId string = assignment.id

@description('The endpoint of the account, for the gateway document.')
output endpoint string = account.properties.endpoint
